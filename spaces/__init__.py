"""Search spaces as YAML presets (``demo``, ``linear``, ``attention``, ``difformer``,
``diffeed``); :func:`difftune.search.space.spec.load_space` reads them by name."""
