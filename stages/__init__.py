"""What dvc.yaml runs: one module per stage (fetch, subset, manifest, testsets, train, eval) and `cli`, the `medasr`
command line that validates params and hands each stage its own blocks. The code they share lives in `medasr`."""
