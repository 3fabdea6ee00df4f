// Evaluates Rampart's GrowthBook payload with GrowthBook's JavaScript SDK, for many units.
//
// Run by tests/routing/test_growthbook_sdks.py as `node growthbook_sdk.cjs` with NODE_PATH
// pointing at the node_modules that holds @growthbook/growthbook. Reads a JSON job from
// stdin: {apiHost, clientKey, features: [key...], units: [id...], exposuresFor: key|null}.
// Writes {results: {key: [[value, trackedVariant|null], ...]}, exposures: {...}|null}.
// The SDK fetches {apiHost}/api/features/{clientKey} itself (GrowthBookClient.init).
// For `exposuresFor`, the tracking callback queues what it sees and the queue is posted to
// POST /v1/exposures with the client key, as the README's snippet does.
"use strict";

const { GrowthBookClient } = require("@growthbook/growthbook");

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const job = JSON.parse(Buffer.concat(chunks).toString("utf8"));

  let tracked = null;
  let currentFeature = null;
  const queue = [];
  const client = new GrowthBookClient({
    apiHost: job.apiHost,
    clientKey: job.clientKey,
    trackingCallback: (experiment, result) => {
      tracked = result.key;
      if (currentFeature === job.exposuresFor) {
        queue.push({ experiment: experiment.key, unit_id: result.hashValue, variant: result.key });
      }
    },
  });
  const init = await client.init({ timeout: 10000 });
  if (!init.success) throw new Error(`GrowthBook init failed: ${JSON.stringify(init)}`);

  const results = {};
  for (const key of job.features) {
    currentFeature = key;
    const values = [];
    for (const unit of job.units) {
      tracked = null;
      const value = client.evalFeature(key, { attributes: { id: unit } }).value;
      values.push([value, tracked]);
    }
    results[key] = values;
  }

  let exposures = null;
  if (job.exposuresFor) {
    const response = await fetch(`${job.apiHost}/v1/exposures`, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Authorization: `Bearer ${job.clientKey}`,
      },
      body: JSON.stringify({ exposures: queue }),
    });
    exposures = { status: response.status, sent: queue.length, body: await response.json() };
  }
  process.stdout.write(JSON.stringify({ results, exposures }));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
