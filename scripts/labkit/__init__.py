"""The lab's steps, each in its own module: ``common`` (names, podman, addresses, SSH),
``image`` (the root file system and image), ``boot`` (a stand-in started and reachable),
``links`` (link caps), ``inventory`` (inventory/lab.yml, cached facts). ``scripts/lab.py`` is
the command line over them."""
