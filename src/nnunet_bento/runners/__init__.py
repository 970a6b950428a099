"""One runner per nnU-Net model: warm predictors, device choice, prediction."""
