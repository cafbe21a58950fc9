"""The demo (``sdjax-demo``, ``./run demo``): both training phases on the synthetic captioned-shapes
set, sampling every shape/colour pair, and a pixel judge of the samples. Not part of the library."""
