"""``hermesd mqtt``: a bridge from an MQTT broker to the local daemon (docs/MQTT.md).

Sensors, hubs and other hermesd nodes publish jobs to topics; the bridge submits each to the local
daemon through ``hermes_client`` and publishes the answer. This package never imports torch: it runs
in its own process (systemd/hermesd-mqtt.service) beside the daemon.
"""
