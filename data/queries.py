"""Clinical queries per target: explicit names, knowledge-based implicit and volume-grounded ones.

Each target has at least ten phrasings. The last ``TEST_PHRASINGS`` of each list are held out for
the test split, so a test query is never seen in training (as the paper paraphrased the KiTS23
test queries into implicit ones).

Label names as datasets publish them ("kidney tumor", "kidneys" in M3D-Seg's ``dataset_info``)
reach their target through ``ALIASES``; :func:`target_of` is the one place that mapping is made.
"""

from __future__ import annotations

import numpy as np

TEST_PHRASINGS = 3

QUERIES: dict[str, list[str]] = {
    "liver": [
        "Segment the liver.",
        "Where is the liver?",
        "Outline the hepatic parenchyma.",
        "Find the organ that secretes bile.",
        "Show the largest solid organ of the abdomen.",
        "Locate the organ that stores glycogen and detoxifies the blood.",
        "Mark the organ drained by the hepatic veins into the inferior vena cava.",
        "Identify the organ in the right upper quadrant that produces bile.",
        "Which organ filters portal venous blood from the gut?",
        "Delineate the organ where albumin is synthesised.",
        "Highlight the organ that sits under the right hemidiaphragm.",
        "Segment the organ affected in hepatitis and cirrhosis.",
    ],
    "spleen": [
        "Segment the spleen.",
        "Where is the spleen?",
        "Outline the splenic parenchyma.",
        "Find the organ that removes old red blood cells.",
        "Locate the lymphoid organ in the left upper quadrant.",
        "Show the organ that enlarges in splenomegaly.",
        "Mark the organ lying against the left hemidiaphragm behind the stomach.",
        "Identify the organ supplied by the splenic artery.",
        "Which organ filters blood and stores platelets?",
        "Delineate the organ at risk of rupture in left-sided blunt trauma.",
        "Highlight the organ that recycles iron from aged erythrocytes.",
    ],
    "kidney": [
        "Segment the kidneys.",
        "Where are the kidneys?",
        "Outline both renal parenchymas.",
        "Find the organs that filter blood and produce urine.",
        "Locate the bean-shaped retroperitoneal organs.",
        "Show the organs drained by the ureters.",
        "Mark the organs that secrete erythropoietin.",
        "Identify the paired organs beside the lumbar spine.",
        "Which organs regulate fluid and electrolyte balance?",
        "Delineate the organs whose function is measured by the glomerular filtration rate.",
        "Highlight the organs that contain nephrons.",
    ],
    "left kidney": [
        "Segment the left kidney.",
        "Where is the left kidney?",
        "Outline the left renal parenchyma.",
        "Find the kidney on the patient's left side.",
        "Locate the kidney that lies next to the spleen.",
        "Show the kidney drained by the left ureter.",
        "Mark the kidney whose vein crosses in front of the aorta.",
        "Identify the kidney below the spleen.",
        "Which kidney usually sits slightly higher than the other?",
        "Delineate the kidney on the same side as the descending colon.",
        "Highlight the kidney supplied by the left renal artery.",
    ],
    "right kidney": [
        "Segment the right kidney.",
        "Where is the right kidney?",
        "Outline the right renal parenchyma.",
        "Find the kidney on the patient's right side.",
        "Locate the kidney that lies below the liver.",
        "Show the kidney drained by the right ureter.",
        "Mark the kidney pushed down by the liver.",
        "Identify the kidney on the same side as the gallbladder.",
        "Which kidney usually sits slightly lower than the other?",
        "Delineate the kidney whose artery passes behind the inferior vena cava.",
        "Highlight the kidney supplied by the right renal artery.",
    ],
    "pancreas": [
        "Segment the pancreas.",
        "Where is the pancreas?",
        "Outline the pancreatic gland.",
        "Find the organ that secretes insulin.",
        "Locate the gland that makes digestive enzymes and empties into the duodenum.",
        "Show the organ whose islets produce glucagon.",
        "Mark the retroperitoneal gland lying across the spine behind the stomach.",
        "Identify the organ inflamed in pancreatitis.",
        "Which organ has a head, neck, body and tail near the splenic vein?",
        "Delineate the organ both endocrine and exocrine in function.",
        "Highlight the gland whose failure causes type 1 diabetes.",
    ],
    "aorta": [
        "Segment the aorta.",
        "Where is the abdominal aorta?",
        "Outline the aorta.",
        "Find the largest artery of the body.",
        "Locate the vessel that carries blood from the heart to the abdomen.",
        "Show the artery in front of the vertebral bodies.",
        "Mark the vessel that gives rise to the renal arteries.",
        "Identify the artery that can develop an abdominal aneurysm.",
        "Which vessel branches into the common iliac arteries?",
        "Delineate the brightest tubular structure beside the spine on contrast CT.",
        "Highlight the artery that gives off the coeliac trunk.",
    ],
    "vertebrae": [
        "Segment the vertebrae.",
        "Where is the spine?",
        "Outline the vertebral bodies.",
        "Find the bones that protect the spinal cord.",
        "Locate the lumbar spine.",
        "Show the bony column at the back of the abdomen.",
        "Mark the bones separated by intervertebral discs.",
        "Identify the densest structures in the midline posteriorly.",
        "Which bones carry the weight of the trunk?",
        "Delineate the bones with spinous and transverse processes.",
        "Highlight the skeleton of the back.",
    ],
    "lungs": [
        "Segment the lungs.",
        "Where are the lung bases?",
        "Outline the lungs.",
        "Find the air-filled organs above the diaphragm.",
        "Locate the organs of gas exchange.",
        "Show the darkest paired regions at the top of the scan.",
        "Mark the organs made of alveoli.",
        "Identify the organs that collapse in a pneumothorax.",
        "Which organs lie in the pleural cavities?",
        "Delineate the organs that oxygenate the blood.",
        "Highlight the organs affected by emphysema.",
    ],
    "kidney tumour": [
        "Segment the kidney tumour.",
        "Where is the renal tumour?",
        "Outline the renal mass.",
        "Find the enhancing solid lesion in the kidney.",
        "Locate the renal cell carcinoma.",
        "Show the lesion that would be removed in a partial nephrectomy.",
        "Mark the solid kidney lesion that takes up contrast.",
        "Identify the suspicious heterogeneous renal mass.",
        "Which renal lesion is a candidate for malignancy?",
        "Delineate the enhancing mass distorting the renal contour.",
        "Highlight the neoplasm arising from the renal parenchyma.",
    ],
    "kidney cyst": [
        "Segment the kidney cyst.",
        "Where is the renal cyst?",
        "Outline the cystic renal lesion.",
        "Find the fluid-filled sac in the kidney.",
        "Locate the simple renal cyst.",
        "Show the non-enhancing water-density lesion of the kidney.",
        "Mark the round renal lesion with fluid attenuation.",
        "Identify the benign fluid collection in the kidney.",
        "Which renal lesion has near-water attenuation?",
        "Delineate the thin-walled cystic structure in the kidney.",
        "Highlight the Bosniak I lesion of the kidney.",
    ],
    "tumour kidney": [
        "Segment the kidney that contains the tumour.",
        "Which kidney harbours the renal mass?",
        "Outline the kidney with the enhancing lesion.",
        "Find the kidney affected by the tumour.",
        "Locate the kidney with a solid mass.",
        "Show the kidney that would undergo nephrectomy for the tumour.",
        "Mark the kidney whose contour is distorted by a neoplasm.",
        "Identify the tumour-bearing kidney.",
        "Which kidney shows a suspicious enhancing lesion?",
        "Delineate the kidney containing a possible renal cell carcinoma.",
        "Highlight the diseased kidney with the solid lesion.",
    ],
    "cyst kidney": [
        "Segment the kidney that contains the cyst.",
        "Which kidney has the fluid-filled sac?",
        "Outline the kidney with an obvious fluid-filled sac.",
        "Find the kidney that contains a cyst.",
        "Locate the kidney with a water-density lesion.",
        "Show the kidney with the simple cyst.",
        "Mark the kidney harbouring a non-enhancing cystic lesion.",
        "Identify the cyst-bearing kidney.",
        "Which kidney shows a round lesion of fluid attenuation?",
        "Delineate the kidney containing a benign fluid collection.",
        "Highlight the kidney with a thin-walled cystic structure.",
    ],
    "bladder": [
        "Segment the urinary bladder.",
        "Where is the bladder?",
        "Outline the bladder.",
        "Find the organ that stores urine.",
        "Locate the hollow organ in the pelvis filled by the ureters.",
        "Show the fluid-filled organ behind the pubic symphysis.",
        "Mark the organ emptied through the urethra.",
        "Identify the pelvic organ that distends as it fills.",
        "Which organ is drained by a urinary catheter?",
        "Delineate the muscular reservoir of the lower urinary tract.",
        "Highlight the organ whose wall is the detrusor muscle.",
    ],
    "bone": [
        "Segment the bones.",
        "Where is the skeleton?",
        "Outline all bony structures.",
        "Find the densest tissue in the scan.",
        "Locate the spine, ribs and pelvis.",
        "Show the structures that contain the bone marrow.",
        "Mark the calcified framework of the body.",
        "Identify the tissue that appears brightest on CT.",
        "Which tissue is made of cortical and trabecular parts?",
        "Delineate the structures where osteolytic metastases would appear.",
        "Highlight the rigid framework that protects the organs.",
    ],
    "brain": [
        "Segment the brain.",
        "Where is the brain?",
        "Outline the brain parenchyma.",
        "Find the organ inside the skull.",
        "Locate the cerebral hemispheres.",
        "Show the organ bathed in cerebrospinal fluid within the cranium.",
        "Mark the organ of grey and white matter in the head.",
        "Identify the organ protected by the calvarium.",
        "Which organ contains the ventricles and the basal ganglia?",
        "Delineate the central nervous tissue above the foramen magnum.",
        "Highlight the organ damaged in a stroke.",
    ],
}

# Published label names -> the target whose phrasings they take. A label that is already a key of
# QUERIES needs no entry; one that is neither gets an explicit query from the caller.
ALIASES: dict[str, str] = {
    "kidney tumor": "kidney tumour",  # KiTS23 in M3D-Seg
    "kidneys": "kidney",  # CT-ORG in M3D-Seg
    "lung": "lungs",
    "urinary bladder": "bladder",
}


class UnknownTargetError(KeyError):
    """A target name with no query phrasings."""


def target_of(label: str) -> str | None:
    """The target of ``QUERIES`` a label name stands for (case and spacing ignored, aliases
    followed), or None when it has no phrasings."""
    name = " ".join(label.replace("_", " ").split()).lower()
    name = ALIASES.get(name, name)
    return name if name in QUERIES else None


def phrasings(target: str, split: str) -> list[str]:
    """The phrasings of ``target`` (a target or an alias of one) for a split: all but the last
    few for train, those for test."""
    key = target_of(target)
    if key is None:
        raise UnknownTargetError(f"no queries for target {target!r}; known: {sorted(QUERIES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    items = QUERIES[key]
    return items[:-TEST_PHRASINGS] if split == "train" else items[-TEST_PHRASINGS:]


def sample_query(target: str, split: str, rng: np.random.Generator) -> str:
    """One phrasing of ``target`` drawn from its split's phrasings."""
    options = phrasings(target, split)
    return options[int(rng.integers(len(options)))]


def training_query(sample, resample: bool, rng: np.random.Generator) -> str:
    """The query one training use of ``sample`` asks: the manifest's, or with ``resample``
    (``data.resample_queries``) a training phrasing of its target drawn with ``rng``, as
    M3D-Seg's loaders draw a question per access. A label with no phrasings keeps its own."""
    if resample and target_of(sample.label) is not None:
        return sample_query(sample.label, "train", rng)
    return sample.query
