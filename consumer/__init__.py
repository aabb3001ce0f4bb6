"""The opstream consumer: a FastStream app that answers operation requests from Kafka."""
