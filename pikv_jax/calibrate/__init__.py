"""Routines that run the model to fit a policy: DuoAttention's head pattern from attention statistics.
(Compressors that learn from data, SVD / LoRA / PiKVCompressor, calibrate from
`PiKVModel.capture_qkv`, which runs in pikv_jax/runtime/capture.py.)"""
