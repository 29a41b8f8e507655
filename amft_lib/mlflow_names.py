"""The MLflow tag and model-type names that training (tracking.py) writes and registration (registry.py)
reads. Why a module of its own: tracking already asks the registry for its client, so the names cannot
live in tracking without an import circle (tests/unit/test_architecture.py refuses any)."""

STAGE_TAG = "amft.stage"  # which pipeline stage logged a run or a LoggedModel
CHECKPOINT_MODEL_TYPE = "amft-checkpoint"  # the model_type of a training checkpoint's LoggedModel
CHECKPOINT_STEP_TAG = "amft.checkpoint_step"
CHECKPOINT_URI_TAG = "amft.checkpoint_uri"  # where the checkpoint's files are (no copy is made)
CHECKPOINT_STATE_TAG = "amft.checkpoint_state"  # "complete", or "deleted" once retention removed it
EXTERNAL_TAG = "mlflow.model.isExternal"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_IS_EXTERNAL
