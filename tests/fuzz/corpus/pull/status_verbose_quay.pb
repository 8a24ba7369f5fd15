
)
'quay.io/prometheus/node-exporter:v1.6.0