"""The demo models' recipe: corpus synthesis (demo_models), training (fast_train),
distillation (distill) and the optional voices (kokoro_voice, pico_voice, gender_change).
Entry point: demo/make-demo-models."""
