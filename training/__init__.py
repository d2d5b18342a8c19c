"""Everything the three training scripts share: the command line, data, the train/eval loop,
checkpoints and TensorBoard logging. The scripts themselves differ only in how they use the device."""
