"""The AMFT pipeline DAG (amft_pipeline.py) and its compiled IR YAML (amft_pipeline.yaml)."""
