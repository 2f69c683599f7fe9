/*
 * The latency benchmark's load generator (bench/throughput.py --load-generator java).
 *
 * It sends events at a fixed rate from a JVM, which costs the machine a small fraction of
 * a core at 32,000 events/s. kafka-python in the benchmark's own process takes about half a
 * core (16 us per send), and on 2 cores that half core is taken from the detector under test.
 *
 *   deploy/kafka/local-kafka java bench/LoadGenerator.java BOOTSTRAP TOPIC EVENTS RATE KEY TIME
 *
 * EVENTS is a file of one event per line, "key<TAB>rest": the rest of the JSON object after
 * its key and time fields, with its leading comma. Each event's time field is the wall
 * clock at its send (the produce timestamp, in seconds). Each event is sent at its scheduled
 * time, or at once when the generator is late. Records are keyed, so they land on the
 * default partitioner's partition, as kafka-python's do. The generator waits for every
 * acknowledgement and then prints one JSON line: the events sent, the seconds the sends
 * took, and the 99th percentile of how late the sends came after their scheduled times.
 */

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.locks.LockSupport;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public final class LoadGenerator {
    /** Events due within this many nanoseconds are sent at once, a little early. */
    private static final long PACING_NANOS = 500_000;
    /** Records wait this long to share a batch: fewer, larger requests for the broker. */
    private static final String LINGER_MS = "5";

    public static void main(String[] args) {
        try {
            run(args);
        } catch (Exception error) { // Java 17's source launcher hides the message of a thrown one
            System.err.println("LoadGenerator: " + error);
            System.exit(1);
        }
    }

    private static void run(String[] args) throws Exception {
        if (args.length != 6) {
            System.err.println("usage: LoadGenerator BOOTSTRAP TOPIC EVENTS RATE KEY_FIELD TIME_FIELD");
            System.exit(2);
        }
        String topic = args[1];
        List<String> lines = Files.readAllLines(Path.of(args[2]), StandardCharsets.UTF_8);
        double rate = Double.parseDouble(args[3]);
        String head = "{\"" + args[4] + "\":\"";
        String time = "\",\"" + args[5] + "\":";

        Properties config = new Properties();
        config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        config.put(ProducerConfig.ACKS_CONFIG, "all");
        config.put(ProducerConfig.LINGER_MS_CONFIG, LINGER_MS);
        config.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        config.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        double[] lateMs = new double[lines.size()];
        long started;
        long finished;
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(config)) {
            producer.partitionsFor(topic); // metadata before the clock starts
            started = System.nanoTime();
            for (int i = 0; i < lines.size(); i++) {
                long due = started + (long) (i * 1e9 / rate);
                long wait = due - System.nanoTime();
                if (wait > PACING_NANOS) { // sleep in steps, not before every event
                    LockSupport.parkNanos(wait);
                }
                lateMs[i] = Math.max(0, System.nanoTime() - due) / 1e6;
                String line = lines.get(i);
                int tab = line.indexOf('\t');
                String key = line.substring(0, tab);
                Instant now = Instant.now();
                String micros = Integer.toString(1_000_000 + now.getNano() / 1000).substring(1);
                String value = head + key + time + now.getEpochSecond() + "." + micros
                        + line.substring(tab + 1);
                producer.send(new ProducerRecord<>(topic, key.getBytes(StandardCharsets.UTF_8),
                        value.getBytes(StandardCharsets.UTF_8)));
            }
            finished = System.nanoTime();
            producer.flush();
        }
        Arrays.sort(lateMs);
        double lateP99 = lateMs.length == 0 ? 0 : lateMs[(int) Math.ceil(0.99 * lateMs.length) - 1];
        System.out.printf("{\"sent\": %d, \"seconds\": %.6f, \"late_p99_ms\": %.3f}%n",
                lines.size(), (finished - started) / 1e9, lateP99);
    }
}
