//! Attacks 1 and 6, against real brokers: K2V across tenants, and dead letters too large for Kafka.
