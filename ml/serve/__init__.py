"""The inference image: `sdxl-lora serve`, SDXL with many LoRA adapters under SageMaker's hosting contract."""
