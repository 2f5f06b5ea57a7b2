"""Read-only TFTP for boot loaders (tftpy packets, blksize/tsize/timeout options).

``appliance.tftp.server.run(config, db, stop)`` is the entry point; see server.py.
"""
