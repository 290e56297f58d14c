"""Exec probe: exit 0 if the agent's metrics say polyarch_agent_connected 1, else 1.

Usage: python agent_connected.py http://127.0.0.1:9601/metrics

Agents serve no gRPC; their Prometheus endpoint (--metrics-listen) says whether the stream
to the coordinator is up. Parsed with prometheus_client's parser, as the tests scrape.
"""

import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    text = response.read().decode()
for family in text_string_to_metric_families(text):
    if family.name == "polyarch_agent_connected" and any(
        sample.value == 1 for sample in family.samples
    ):
        sys.exit(0)
sys.exit("not connected to the coordinator")
