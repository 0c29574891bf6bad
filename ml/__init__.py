"""SDXL LoRA job payload: what runs inside the SageMaker containers.

Keep this module free of imports: the orchestration side imports light modules
from this package (for example ml.contract.metrics) without the torch stack installed.
"""
