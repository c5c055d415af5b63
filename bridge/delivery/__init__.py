"""Getting accepted callbacks into Kafka in order: the pipeline, the producer, the local spool
and its drainer, redelivery dedupe, and the topics. May import `contract`, `ops` and
`settings`."""
