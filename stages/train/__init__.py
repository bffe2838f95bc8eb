"""The train stage (`medasr train`): `run` trains and exports; `checkpoints` decides what a run resumes; `callback`
saves, restores, validates and stops; `data` gives the training loader a resumable position; `config` derives NeMo's
and Lightning's settings from `train.*`. Importing this package imports none of them, so the light ones (checkpoints,
config) load without NeMo."""
