"""Text the project ships: haystacks for passkey retrieval, held-out text for perplexity and calibration."""
