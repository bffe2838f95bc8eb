"""Operations around the pipeline, not steps of it: the checkpoint mirror and run status on the DVC remote
(`mirror`, `status`), RunPod's API and the pod watcher (`runpod`, `watch`), and `doctor`."""
