"""The processing image: `sdxl-lora prepare` validates, captions, buckets and caches a dataset version."""
