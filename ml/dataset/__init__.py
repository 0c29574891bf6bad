"""The dataset version's format, shared by the prepare and the training job: the imagefolder with its
metadata.jsonl, the aspect-ratio buckets, and the VAE latent cache."""
