"""LoRA weight math that more than one job image runs (torch, no pipeline): community files (kohya LoRA/LoCon,
LyCORIS LoHa/LoKr) as per-module weight deltas, which the endpoint fuses per request and a scoring job fuses
once (ml.lora.deltas)."""
