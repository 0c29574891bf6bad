"""The torch-free contract both sides of the container seam share: the /opt/ml layout and its names, the
hyperparameter table, the metric lines, which image runs which verb, and the processed dataset's manifest.

dags/, plugins/ and local_stack/ import only this package of ml/: nothing here imports torch, PIL or numpy.
"""
