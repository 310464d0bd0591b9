module quota-sidecar.example/go-host-app

go 1.19
