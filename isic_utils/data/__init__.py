"""The data: where it is (archives, layouts), decoded once, what the model sees, the splits, the EDA's measurements, the synthetic default."""
