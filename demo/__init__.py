"""qpipe's demo-model lab: how models/demo_quartznet.nemo and models/demo_conformer.nemo
were made (synthetic TTS corpus + NeMo CTC training). Not part of the product: nothing
in ``qpipe`` imports from here. See demo/README.md."""
