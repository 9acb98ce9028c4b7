"""What every floor stands on: the run config, runtime set-up, local services, tracking, the CLI."""
