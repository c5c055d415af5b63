"""Tools for trying the bridge without Luma or a Kafka cluster: the embedded broker and
`simulate`, a stand-in for Luma with its retries. May import `contract` and `settings`."""
