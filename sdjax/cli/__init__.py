"""sdjax's command lines (console scripts ``sdjax-txt2img``, ``sdjax-img2img``, ``sdjax-train``);
``sample/*.py`` and ``train/*.py`` in a checkout are thin wrappers around them."""
