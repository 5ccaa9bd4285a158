"""vltrain: the embedded vision-language pre-training trainer (DeepSpeed ZeRO-2).

Importing the package is cheap: torch, deepspeed and webdataset are imported only by the modules
that train, so clusterctl can read presets from `vltrain.config` without them.
"""
