"""nnU-Net prediction split in two: the CPU steps (preprocessing, export) and the network
step in warm predictors; device choice; what crosses between the two."""
