"""The training image: `sdxl-lora train` trains a LoRA (or scores one) under the SageMaker training contract."""
