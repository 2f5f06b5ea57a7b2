"""The CLI over the JSON API (``appliance --endpoint URL --token ...``)."""
