"""Run the DHCP part alone: ``python -m appliance.dhcp [--config FILE]`` (development and
tests; production runs it under ``appliance serve``)."""

from __future__ import annotations

import argparse
import logging

from appliance.config import load_config
from appliance.db import Database
from appliance.dhcp.server import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m appliance.dhcp")
    parser.add_argument("--config", help="TOML configuration file")
    args = parser.parse_args()
    config = load_config(args.config)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    db = Database(config.effective_database_url)
    db.migrate()
    run(config, db)


if __name__ == "__main__":
    main()
