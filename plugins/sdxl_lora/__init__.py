"""The DAGs' library: settings, job naming, the grid, request builders and trial selection.

Pure Python over boto3-shaped dicts; nothing here imports torch, diffusers or the SageMaker SDK,
so the DAG files that import it parse fast.
"""
