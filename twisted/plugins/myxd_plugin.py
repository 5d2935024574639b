from twisted.application.service import ServiceMaker

myxd = ServiceMaker(
    "MyX daemon", "myxd.tap", "MyX fleet daemon: agents, commands, admin API.", "myxd"
)
