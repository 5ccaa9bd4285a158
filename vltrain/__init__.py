"""vltrain: the embedded vision-language pre-training trainer: DeepSpeed ZeRO 0-2, or PyTorch FSDP2 with
tensor and pipeline parallel (vltrain.engines).

Importing the package is cheap: torch, deepspeed and webdataset are imported only by the modules
that train, so clusterctl can read presets from `vltrain.config` without them.
"""
