"""Speech recognition around a quantized model: CTC decoding (greedy, beam + word LM),
WER/CER with one text normalization, and ``qpipe eval``. Knows nothing of how a model
was quantized: it opens output folders through the backends."""
