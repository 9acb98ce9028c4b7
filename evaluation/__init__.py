"""evaluation: DSC/IoU tables and inference on a user's NIfTI."""
