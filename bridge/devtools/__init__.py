"""Tools for trying the bridge without Luma or a Kafka cluster: the embedded broker,
`simulate` (a stand-in for Luma with its retries), `fake_luma` (a fake of Luma's API, with a
sender that loses callbacks) and the state file through which `dev` points the other
commands at its broker. May import `contract` and `settings`."""
