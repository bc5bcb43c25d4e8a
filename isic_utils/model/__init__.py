"""The model: encoders and decoders (networks) and a trained checkpoint applied (inference)."""
