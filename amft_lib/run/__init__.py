"""One pipeline run, as plain Python: where its files live, the checks before it starts, what
each stage does, and what it left behind.

Why a package of its own: the KFP components (`components/`), the local runner and the
`amft` CLI all need the same run-level steps. Keeping them here, with no import of kfp,
`components` or `pipelines`, means a cluster task and a laptop run execute the same code, and the
library stays importable (and testable) without the orchestration layer.

- `layout`    — `RunRoot`: every path of a run folder (the S3 layout contract), publish/put_json.
- `settings`  — the one table of pipeline settings (name, config key, type, default, help, group).
- `preflight` — checks that can fail before a GPU is requested; builds both stage configs.
- `stages`    — each stage's body (what a component does besides reading/writing KFP artifacts).
- `summary`   — the run summary and the lineage record, read back from the run root.
- `scale_out` — where the train stage's processes run: in-pod, local torchrun, or a Kubeflow Trainer TrainJob.
- `trainjob`  — the TrainJob manifest, as a pure function (validated against the CRD in the tests).
- `trainjob_watch` — create / re-attach / follow / delete a TrainJob through the kubernetes client.
"""
