"""The driver side of pmd: what talks to a device (transports, sessions), never to the built-in device."""
