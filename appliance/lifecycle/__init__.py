"""Machine lifecycle: states and transitions, reimage, events, the post-provision contract.

``events`` (registration of machines as they are seen, and their event rows) is
re-exported here: every part records events through ``appliance.lifecycle``.
"""

from appliance.lifecycle.events import DISCOVERED, record_event, record_seen

__all__ = ["DISCOVERED", "record_event", "record_seen"]
