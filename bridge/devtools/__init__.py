"""Tools for trying the bridge without Luma or a Kafka cluster: the embedded broker,
`simulate` (a stand-in for Luma with its retries) and `fake_luma` (a fake of Luma's API,
with a sender that loses callbacks). May import `contract` and `settings`."""
