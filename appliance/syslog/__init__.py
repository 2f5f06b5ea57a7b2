"""Remote syslog for installer logs: debian-installer (``log_host=``/``log_port=``),
anaconda (``inst.syslog=``) and anything else that speaks syslog over UDP or TCP.

``parse``: RFC 3164 / RFC 5424 / bare ``<PRI>msg`` and TCP framing; ``batch``: batched
writes through ``appliance.installlogs`` and retention; ``server``: the daemon part.
"""
