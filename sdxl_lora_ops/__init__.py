"""`sdxl-lora-ops`: what a person runs beside Airflow (the demo, the Airflow launcher, one-off jobs, image
bases). It starts the local stack and the payload as processes; it is not shipped in the job images' code paths."""
