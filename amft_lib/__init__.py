"""amft_lib: single-stage SFT+RL fine-tuning with a meta-learned balance (AMFT), as a library.

Everything real lives here; `components/` and `pipelines/` are thin KFP wrappers around it.
This package never imports kfp. Heavy optional dependencies (great_expectations, mlflow, boto3)
are imported only inside the module that uses them so `amft --help` stays fast.
"""

__version__ = "0.1.0"
