"""The service around the core: the /predict contract and its statuses (service.py), explanation admission
(admission.py), the TorchServe handler packed into each .mar (skin_handler.py), ports, URLs and model names
(settings.py), the nginx template and its renderer (nginx.conf, proxy.py) and the per-model TorchServe settings
(*.yaml). Nothing in skinlesion/ imports from here."""
