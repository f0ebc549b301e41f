# Prometheus where its public image cannot be pulled: Debian's binary on the offline base (build.sh).
ARG BASE=distserve-base:bookworm
FROM ${BASE}
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
